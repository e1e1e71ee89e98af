"""ID-SPAM (Muppidi et al., arXiv 2506.05629): an input-dependent prompt from a self-attention generator, inserted
before layer m.

``config`` (options), ``module`` (the generator), ``explain`` (which tokens drove a prompt) and ``cli``
(``softprompt explain``).
"""

from .config import IDSPAMConfig, id_spam_parameter_count
from .module import IDSPAM

__all__ = ["IDSPAM", "IDSPAMConfig", "id_spam_parameter_count"]
