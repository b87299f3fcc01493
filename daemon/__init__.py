"""pieced daemon and command line."""
