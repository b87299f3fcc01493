"""pieced configuration."""
