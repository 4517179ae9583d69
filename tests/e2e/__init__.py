"""End-to-end tests: real clients and servers through a real goma-pt process."""
