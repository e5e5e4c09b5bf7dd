"""A device in the federation: its profile and simulated time, its round as a Flower
client, the sparse wire format, and its local partition file."""
