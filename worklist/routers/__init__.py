"""One router per area of the web app: auth, worklist, study, analyse, admin, health."""
