"""
Exercise 5: the specialization and coupling losses of Hu et al. 2026.

Task:
- specialization(z): z (T, k, f) are the SwiGLU intermediates of each token's k selected experts.
  Return the mean over tokens of the sum over ordered pairs i != j of cos^2(z[t, i], z[t, j]).
  (k(k-1) when the k vectors are parallel, 0 when orthogonal, 0 for k = 1.)
- coupling(probs_list, idx_list): for consecutive MoE layers l, M^l_t is the sum of probs^l[t] over
  the experts layer l selected for token t (idx_list[l][t]). Return
  -mean_t sum_{l} M^l_t * M^{l+1}_t  (0 for fewer than 2 layers).

Hint: normalise the rows of z (guard the norm with a small epsilon) and use a batched matmul
for the cosines; gather picks the selected probabilities.
"""

import torch


def specialization(z):
    raise NotImplementedError


def coupling(probs_list, idx_list):
    raise NotImplementedError
