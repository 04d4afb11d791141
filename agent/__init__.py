"""sre-agent: a self-healing agent for Kubernetes built around Kafka."""
