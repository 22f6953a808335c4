"""How the model does at this site: scores, flags, drift and, where radiologists recorded the
truth, sensitivity, specificity, PPV and AUC.  Shared by the web app's Performance page and
`xray-triage site-report`; reads the database, computes with ``models.metrics``."""
