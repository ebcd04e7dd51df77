"""Client side of qstore: the `qstore` command line, the client library and the S3 gateway."""
