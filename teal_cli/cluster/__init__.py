"""Fitting k-means codecs: the k-means engine, the fitting pipeline over features, the feature cache and the fairseq km.bin format."""
