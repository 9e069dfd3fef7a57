"""The public HTTP API: authenticates, authorises, validates, translates to
gRPC and maps errors back. No business logic lives here."""
