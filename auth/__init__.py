"""Users, password hashing, sessions, tickets and the HTTP authentication middleware."""
