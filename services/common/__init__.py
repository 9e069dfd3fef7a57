"""The runtime every Moneta service shares: settings, logging, the gRPC server
runner, errors, PostgreSQL, RabbitMQ, Redis and money arithmetic."""
