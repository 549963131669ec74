"""Backdoor defences other than MIMIC, the baselines of the attack zoo: unlearning with a (given or
inverted) trigger (:mod:`mimic.defenses.unlearn`) and pruning (fine-pruning, CLP:
:mod:`mimic.defenses.prune`). Each takes the teacher and the defender's clean set D (the same
budget as MIMIC's) and returns an encoder of the teacher's architecture."""
