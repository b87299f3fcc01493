"""pieced storage: metainfo, layout, backends, hashing and the buffer pool."""
