"""The HTTP edge: parse and check requests, call the services, render JSON. No storage logic."""
