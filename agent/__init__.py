"""The edgefarm device agent: dials the coordinator and measures models.

Nothing in this package may import ray, sqlalchemy, scikit-learn, ``coordinator``
or ``results``: an agent runs on small devices with only its backend installed.
"""
