"""Ray Serve app (compositional generation + catalog browsing). Built in the Serve issue; the library's
generation API (motiondirector.generate) and catalog (motiondirector.catalog) are what it will call."""
