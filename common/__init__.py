"""What auth/ and transfer/ share, below both: the error a client sees, the fields a request
adds to its access-log line, and the state store's interface. It imports neither."""
