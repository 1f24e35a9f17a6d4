"""The device agent: a small HTTP server on the device, and its client."""
