test_that("cbn_config reports the core; thread and SIMD settings apply", {
  config <- cbn_config()
  expect_match(config$version, "^[0-9]+\\.[0-9]+\\.[0-9]+")
  expect_true(config$isa %in% c("scalar", "avx2", "avx512"))
  expect_equal(cbn_set_threads(1), 1L)
  x <- random_array(c(300, 4), 30)
  one <- bn_moments(x)
  expect_equal(cbn_set_threads(2), 2L)
  expect_equal(bn_moments(x), one, tolerance = 1e-14)
  expect_equal(cbn_set_isa("scalar"), "scalar")
  expect_equal(bn_moments(x), one, tolerance = 1e-14)
  expect_equal(cbn_set_isa(""), config$best_isa)
  cbn_set_threads(0)
  expect_error(cbn_set_threads("a"), "whole number")
  expect_error(cbn_set_isa("sse9"), "bn_set_isa_by_name failed: .*sse9")
  expect_error(cbn_set_isa(1), "one string")
})

test_that("forked children (parallel) work after a threaded call", {
  skip_on_os("windows")  # no fork()
  x <- random_array(c(100000, 4), 31)
  cbn_set_threads(2)
  expected <- bn_moments(x)$mean  # starts OpenMP's thread pool in the parent
  job <- parallel::mcparallel(bn_moments(x)$mean)
  res <- parallel::mccollect(job, wait = FALSE, timeout = 60)
  if (is.null(res)) {
    tools::pskill(job$pid)
    fail("the forked child hung after a threaded call in the parent")
    return()
  }
  expect_equal(res[[1]], expected, tolerance = 1e-14)
  out <- parallel::mclapply(1:2, function(i) bn_train_forward(x * i)$mean, mc.cores = 2)
  expect_equal(out[[2]], 2 * expected, tolerance = 1e-13)
  expect_equal(bn_moments(x)$mean, expected)  # the parent keeps its threads
  cbn_set_threads(0)
})
