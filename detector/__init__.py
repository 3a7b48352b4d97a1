"""Real-time detector of stolen EC2 instance credentials (GuardDuty InstanceCredentialExfiltration)."""

__version__ = "0.1.0"
