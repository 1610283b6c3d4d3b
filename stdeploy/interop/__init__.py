"""NIR out to other frameworks' readers and NIR in from their exporters.

* :mod:`.nirtorch_map`: a public nirtorch node map that runs our graphs spike-exactly.
* :mod:`.readers`: load and step a graph in snnTorch, SpikingJelly, Norse or nirtorch.
* :mod:`.importer`: ``stdeploy import``: a foreign NIR graph -> an export directory.
"""
