"""The api service: the public REST API for webhooks, objects and events."""
