from hsa_geo.nn.conv.hsa_conv import HSAConv, resolve_hierarchy

__all__ = ['HSAConv', 'resolve_hierarchy']
