"""Action consumers: policy, execution against the cluster, approvals and verification."""
