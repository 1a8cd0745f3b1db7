"""A stand-in for the compiled sampling op behind PyG's NeighborLoader
(pyg-lib or torch-sparse), so that the loader's own batch assembly runs in
tests on machines without either."""
import torch


def first_neighbors(self, seed, seed_time=None, **kwargs):
    r"""A stand-in for the compiled sampling op of PyG's NeighborSampler:
    each hop takes the first incoming neighbours (CSC order) of the frontier,
    and returns what the op returns (sampled nodes, seeds first; local rows
    and columns; edge ids)."""
    from torch_geometric.sampler import SamplerOutput
    colptr, row = self.colptr.tolist(), self.row.tolist()
    nodes = seed.tolist()
    index = {node: i for i, node in enumerate(nodes)}
    rows, cols, edges, frontier = [], [], [], list(nodes)
    for fanout in self.num_neighbors.get_mapped_values():
        reached = []
        for target in frontier:
            for edge in range(colptr[target], min(colptr[target + 1], colptr[target] + fanout)):
                source = row[edge]
                if source not in index:
                    index[source] = len(nodes)
                    nodes.append(source)
                    reached.append(source)
                rows.append(index[source])
                cols.append(index[target])
                edges.append(edge)
        frontier = reached
    return SamplerOutput(node=torch.tensor(nodes), row=torch.tensor(rows, dtype=torch.long),
                         col=torch.tensor(cols, dtype=torch.long),
                         edge=torch.tensor(edges, dtype=torch.long), batch=None)
