"""Graph passes of bfc (installed as ``bfc.passes``)."""
