"""--method name -> model class (MeanShift subclasses, and the cross-entropy baseline)."""

from cmsf_tf.methods.byol import BYOL
from cmsf_tf.methods.cmsf_2q import CMSF2Q
from cmsf_tf.methods.cmsf_km import CMSFKM
from cmsf_tf.methods.cmsf_pseudo import CMSFPseudo
from cmsf_tf.methods.cmsf_sup import CMSFSup
from cmsf_tf.methods.msf import MSF
from cmsf_tf.methods.xent import CrossEntropy

METHODS = {
    "byol": BYOL,
    "msf": MSF,
    "cmsf_sup": CMSFSup,
    "cmsf_2q": CMSF2Q,
    "cmsf_km": CMSFKM,
    "cmsf_pseudo": CMSFPseudo,
    "xent": CrossEntropy,
}
