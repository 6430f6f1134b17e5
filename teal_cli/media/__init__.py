"""Media in and out: image and audio decoding, pixel preparation, the log-mel front end, input and output records."""
