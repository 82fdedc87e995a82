"""Gradient reduction and collectives over the Topology's communicators."""
