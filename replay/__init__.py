"""replay: read, play and verify guarita recordings."""
