"""gRPC plumbing shared by every service: server creation with health and
reflection, the one error-to-status table, and bearer-token authentication."""
