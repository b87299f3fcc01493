"""pieced wire protocol and client library."""
