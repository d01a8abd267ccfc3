library(testthat)
library(cbn)

test_check("cbn")
