"""pieced-peer: a BitTorrent peer whose storage is the pieced daemon."""
