"""Point-correspondence fitting shared by :mod:`regsam.embed` and :mod:`regsam.register`.

Layer: above :mod:`regsam.io` and :mod:`regsam.data`, below :mod:`regsam.embed`.
"""
