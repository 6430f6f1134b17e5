"""The process the library runs in: device and dtype choice, CPU threads, quiet third-party libraries."""
