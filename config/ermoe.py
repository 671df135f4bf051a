# The default ERMoE run: the eigenbasis router (router.py, docs/design.md §2) in place of the linear
# softmax router, no load-balancing loss and no z-loss. Its own defaults (router.py, model.py) are what
# keeps it alive and competitive on text (course/demos.py ermoe-search): experts that read the whole token
# (reading their r = d/E coordinates they held half the parameters) and the loss-free select bias of Wang
# et al. 2024 (the coupling loss turned the subspaces of the experts a token did not choose away from the
# tokens; an expert that no token selects gets no gradient and never comes back: 7 of 32 died).
# Everything else as in the default run.
out_dir = "out-ermoe"
router = "ermoe"
ermoe_basis = "independent"  # 'partitioned' = disjoint subspaces (rank d/E); 'penalty' = soft-orthogonality ablation
c_lb = 0.0
c_z = 0.0
