"""The session layer: what a device's frames mean, who receives an event, and in what order."""
