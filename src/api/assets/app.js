// sitegate admin page (replaced by the page branch)
