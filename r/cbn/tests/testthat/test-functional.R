test_that("bn_moments matches apply() for every axis form", {
  x <- random_array(c(5, 3, 4), 1, mean = 3)
  cases <- list(list(-1, 3), list(3, 3), list(2, 2), list(-2, 2), list(1, 1), list(-3, 1),
                list(c(2, 3), c(2, 3)), list(c(-1, 2), c(2, 3)), list(c(3, 1), c(1, 3)))
  for (case in cases) {
    got <- bn_moments(x, axis = case[[1]])
    ref <- ref_moments(x, case[[2]])
    expect_equal(as.vector(got$mean), as.vector(ref$mean), tolerance = 1e-14)
    expect_equal(as.vector(got$variance), as.vector(ref$variance), tolerance = 1e-14)
    expect_equal(dim(got$mean), dim(x)[case[[2]]])
    expect_equal(as.vector(got$count), rep(prod(dim(x)) / prod(dim(x)[case[[2]]]),
                                          prod(dim(x)[case[[2]]])))
  }
})

test_that("several channel axes keep R's (column-major) channel order", {
  x <- random_array(c(2, 3, 4), 2)
  got <- bn_moments(x, axis = c(2, 3))
  expect_equal(got$mean, apply(x, c(2, 3), mean), tolerance = 1e-14)
})

test_that("hand numbers: moments, normalize, train_forward", {
  x <- matrix(c(1, 2, 3, 10, 20, 30), nrow = 3)
  m <- bn_moments(x)
  expect_equal(as.vector(m$mean), c(2, 20))
  expect_equal(as.vector(m$variance), c(2 / 3, 200 / 3))
  y <- bn_normalize(x, mean = c(2, 20), variance = c(1, 100), epsilon = 1e-300)
  expect_equal(y, matrix(c(-1, 0, 1, -1, 0, 1), nrow = 3))
  y <- bn_normalize(x, mean = c(2, 20), variance = c(1, 100), gamma = c(2, 3), beta = c(1, -1),
                    epsilon = 1e-300)
  expect_equal(y, matrix(c(-1, 1, 3, -4, -1, 2), nrow = 3))
  fw <- bn_train_forward(matrix(c(1, 3)), beta = 5, epsilon = 1e-300)
  expect_equal(fw$y, matrix(c(4, 6)))
  # One position per channel: variance 0, the output is beta.
  expect_equal(bn_train_forward(c(1, 3), beta = c(7, 8), axis = 1)$y, c(7, 8))
})

test_that("a vector is a rank-1 array; integers and logicals are read as doubles", {
  expect_equal(as.vector(bn_moments(1:4, axis = -1)$mean), 1:4)
  expect_equal(as.vector(bn_moments(matrix(1:6, 3), axis = 2)$mean), c(2, 5))
  expect_equal(as.vector(bn_moments(matrix(c(TRUE, FALSE), 2, 1))$mean), 0.5)
})

test_that("bn_normalize and bn_train_forward match sweep()", {
  x <- random_array(c(6, 3, 2), 3, mean = -2, sd = 4)
  gamma <- c(1.5, -0.5, 2)
  beta <- c(0.1, 0.2, 0.3)
  ref <- ref_moments(x, 2)
  y <- bn_normalize(x, ref$mean, ref$variance, gamma, beta, axis = 2, epsilon = 0.01)
  expect_equal(y, ref_normalize(x, 2, ref$mean, ref$variance, gamma, beta, 0.01),
               tolerance = 1e-13)
  fw <- bn_train_forward(x, gamma, beta, axis = 2, epsilon = 0.01)
  expect_equal(fw$y, y, tolerance = 1e-13)
  expect_equal(as.vector(fw$variance), ref$variance, tolerance = 1e-13)
})

test_that("masks: full rank, one axis fewer, broadcast sizes, empty channels", {
  x <- random_array(c(4, 3, 2), 4)
  keep <- array(c(TRUE, FALSE, TRUE, TRUE), c(4, 3))
  m <- bn_moments(x, axis = -1, mask = keep)
  for (k in 1:2) {
    v <- x[, , k][keep]
    expect_equal(m$mean[k], mean(v), tolerance = 1e-14)
    expect_equal(m$variance[k], mean((v - mean(v))^2), tolerance = 1e-14)
    expect_equal(m$count[k], sum(keep))
  }
  rows <- array(c(1, 0, 1, 1), c(4, 1, 1))  # numeric, broadcast over axes 2 and 3
  m2 <- bn_moments(x, axis = 2, mask = rows)
  expect_equal(as.vector(m2$mean), apply(x[c(1, 3, 4), , ], 2, mean), tolerance = 1e-14)
  none <- array(FALSE, c(4, 3, 2))
  none[, , 1] <- TRUE
  m3 <- bn_moments(x, axis = 3, mask = none)
  expect_equal(as.vector(m3$mean)[2], 0)
  expect_equal(as.vector(m3$variance)[2], 0)
  fw <- bn_train_forward(x, axis = 3, mask = none)
  expect_equal(fw$y[, , 1], (x[, , 1] - m3$mean[1]) / sqrt(m3$variance[1] + 0.001),
               tolerance = 1e-13)
  expect_equal(fw$y[, , 2], x[, , 2] / sqrt(0.001), tolerance = 1e-13)  # every position normalized
})

test_that("bn_backward matches finite differences, training and inference, with a mask", {
  x <- random_array(c(5, 2, 3), 5)
  dy <- random_array(c(5, 2, 3), 6)
  gamma <- c(1.3, -0.7)
  mask <- array(c(1, 1, 0, 1, 1), c(5, 1, 1))
  for (m in list(NULL, mask)) {
    fw <- bn_train_forward(x, gamma, c(0.5, 0), axis = 2, mask = m)
    bw <- bn_backward(dy, x, fw$mean, fw$variance, gamma, axis = 2, mask = m)
    f <- function(z) bn_train_forward(z, gamma, c(0.5, 0), axis = 2, mask = m)$y
    expect_equal(bw$dx, finite_difference(f, x, dy), tolerance = 1e-7)
    xhat <- bn_normalize(x, fw$mean, fw$variance, axis = 2)
    expect_equal(as.vector(bw$dbeta), apply(dy, 2, sum), tolerance = 1e-13)
    expect_equal(as.vector(bw$dgamma), apply(dy * xhat, 2, sum), tolerance = 1e-12)
  }
  moving <- list(mean = c(0.1, -0.2), variance = c(2, 0.5))
  bw <- bn_backward(dy, x, moving$mean, moving$variance, gamma, axis = 2, training = FALSE)
  f <- function(z) bn_normalize(z, moving$mean, moving$variance, gamma, axis = 2)
  expect_equal(bw$dx, finite_difference(f, x, dy), tolerance = 1e-8)
})

test_that("inputs are never written", {
  x <- random_array(c(3, 4), 7)
  keep <- x + 0
  invisible(bn_train_forward(x))
  invisible(bn_normalize(x, 1:4, 1:4))
  invisible(bn_backward(x, x, 1:4, 1:4))
  expect_identical(x, keep)
})

test_that("bad arguments raise clear errors", {
  x <- matrix(1, 3, 2)
  expect_error(bn_moments(x, axis = 0), "axes are 1-based")
  expect_error(bn_moments(x, axis = 3), "out of range for an input of rank 2")
  expect_error(bn_moments(x, axis = -3), "out of range")
  expect_error(bn_moments(x, axis = c(2, -1)), "same axis twice")
  expect_error(bn_moments(x, axis = c(1, 1)), "repeats an axis")
  expect_error(bn_moments(x, axis = 1.5), "whole numbers")
  expect_error(bn_moments(x, axis = "a"), "whole numbers")
  expect_error(bn_moments(x, axis = NA), "whole numbers")
  expect_error(bn_moments("a"), "numeric array")
  expect_error(bn_moments(data.frame(a = 1)), "data frame")
  expect_error(bn_moments(numeric(0)), "empty")
  expect_error(bn_moments(x, mask = matrix(TRUE, 2, 2)), "does not broadcast")
  expect_error(bn_moments(x, mask = c(TRUE, NA, TRUE)), "NA")
  expect_error(bn_moments(x, mask = "yes"), "logical or numeric")
  expect_error(bn_normalize(x, 1:3, 1:2), "one value per channel \\(2\\)")
  expect_error(bn_normalize(x, 1:2, 1:2, epsilon = 0), "positive")
  expect_error(bn_backward(matrix(1, 2, 2), x, 1:2, 1:2), "expected the shape of `x`")
  expect_error(bn_backward(x, x, 1:2, 1:2, training = NA), "TRUE or FALSE")
})
