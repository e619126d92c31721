"""Test infrastructure: locating the real tools (Tansu, Envoy, Mosquitto) and running them as fixtures."""
