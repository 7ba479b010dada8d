"""subroutine_circuits: does a network break a compositional task into subroutines?"""

__version__ = "0.1.0"
