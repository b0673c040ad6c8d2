"""kombu transports that ship with consumerd."""
