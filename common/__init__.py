"""Shared types and mechanisms of Candor; imports nothing local."""
