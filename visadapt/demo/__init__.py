"""Entry points besides ``python -m visadapt``: small scripts a person runs on their own files.

* :mod:`visadapt.demo.manipulation`: ``python -m visadapt.demo.manipulation IMAGE [IMAGE ...]`` (console script
  ``visadapt-manipulation-demo``) runs a trained ManipShield detector on images.

Like ``visadapt/cli.py`` they sit in the top (``cli``) layer: they may import every other layer.
"""
