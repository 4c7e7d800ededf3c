"""The pipeline, one readable file per stage; each runs alone as `python -m wsss.stages.<name>`.

images + weak labels -> train_cam -> cam -> pseudo -> train_seg -> (cyclic) -> evaluate -> report
"""
