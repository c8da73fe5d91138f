"""``distrib-ft retrain``: scheduled retraining as a pipeline of rounds over a model registry (issue 12).

``config`` reads the pipeline file, ``rounds`` builds one round's job from the template job and the registry's
state, ``gate`` decides from a round's report.json whether its model may be promoted, ``pipeline`` runs the rounds
(each exactly as ``distrib-ft train`` runs a job), ``merge_back`` interpolates a refused candidate toward its start
and ``forgetting`` measures every round's model on every round's held-out set (GEM's R, ACC, BWT, FWT).
"""
