test_that("a new layer in inference mode divides by sqrt(1 + epsilon)", {
  bn <- layer_batch_normalization()
  x <- random_array(c(4, 3), 10)
  expect_equal(bn(x), x / sqrt(1.001), tolerance = 1e-15)
  expect_equal(layer_batch_normalization(x, epsilon = 0.5), x / sqrt(1.5), tolerance = 1e-15)
})

test_that("training uses batch statistics and updates the moving ones (Keras rule)", {
  x <- random_array(c(8, 3), 11, mean = 4, sd = 2)
  bn <- layer_batch_normalization(momentum = 0.9, epsilon = 0.01)
  y <- bn(x, training = TRUE)
  ref <- ref_moments(x, 2)
  expect_equal(y, ref_normalize(x, 2, ref$mean, ref$variance, epsilon = 0.01), tolerance = 1e-13)
  expect_equal(as.vector(bn$moving_mean), 0.1 * ref$mean, tolerance = 1e-14)
  expect_equal(as.vector(bn$moving_variance), 0.9 + 0.1 * ref$variance, tolerance = 1e-14)
  y2 <- bn(x, training = TRUE)
  expect_equal(as.vector(bn$moving_mean), 0.9 * 0.1 * ref$mean + 0.1 * ref$mean, tolerance = 1e-14)
  inference <- bn(x)
  expect_equal(inference, ref_normalize(x, 2, as.vector(bn$moving_mean),
                                        as.vector(bn$moving_variance), epsilon = 0.01),
               tolerance = 1e-13)
  expect_equal(bn(x, training = NULL), inference)
})

test_that("trainable = FALSE forces inference, also for training = TRUE", {
  x <- random_array(c(5, 2), 12)
  bn <- layer_batch_normalization(trainable = FALSE)
  expect_equal(bn(x, training = TRUE), x / sqrt(1.001))
  expect_equal(as.vector(bn$moving_mean), c(0, 0))
  bn$trainable <- TRUE
  expect_true(bn$trainable)
  invisible(bn(x, training = TRUE))
  expect_false(isTRUE(all.equal(as.vector(bn$moving_mean), c(0, 0))))
  expect_error(bn$trainable <- "no", "TRUE or FALSE")
  expect_error(bn$momentum <- 0.5, "only `trainable` can")
})

test_that("channels-first axis = 2, several axes, negative axes", {
  x <- random_array(c(3, 2, 4, 5), 13)
  for (case in list(list(2, 2), list(-3, 2), list(c(2, 4), c(2, 4)), list(c(-1, 2), c(2, 4)))) {
    bn <- layer_batch_normalization(axis = case[[1]], center = FALSE, epsilon = 0.1)
    y <- bn(x, training = TRUE)
    ref <- ref_moments(x, case[[2]])
    expect_equal(y, ref_normalize(x, case[[2]], ref$mean, ref$variance, epsilon = 0.1),
                 tolerance = 1e-13)
    expect_equal(dim(bn$moving_mean), dim(x)[case[[2]]])
    expect_equal(length(get_weights(bn)), 3L)  # gamma, moving_mean, moving_variance
  }
})

test_that("masks in training; inference ignores the mask but checks its shape", {
  x <- random_array(c(6, 5, 2), 14)
  mask <- matrix(rep(c(TRUE, FALSE), 15), 6, 5)
  bn <- layer_batch_normalization(momentum = 0)
  y <- bn(x, training = TRUE, mask = mask)
  for (k in 1:2) {
    v <- x[, , k][mask]
    mu <- mean(v)
    s2 <- mean((v - mu)^2)
    expect_equal(y[, , k], (x[, , k] - mu) / sqrt(s2 + 0.001), tolerance = 1e-13)
    expect_equal(bn$moving_mean[k], mu, tolerance = 1e-14)
  }
  expect_equal(bn(x, mask = mask), bn(x))
  expect_error(bn(x, mask = matrix(TRUE, 5, 5)), "does not broadcast")
})

test_that("get_weights / set_weights in Keras order, with errors that change nothing", {
  bn <- layer_batch_normalization(axis = c(2, 3))
  expect_equal(get_weights(bn), list())
  expect_error(set_weights(bn, list()), "no weights yet")
  x <- random_array(c(4, 2, 3), 15)
  invisible(bn(x, training = TRUE))
  w <- list(array(1:6, c(2, 3)), array(7:12, c(2, 3)), array(-1, c(2, 3)), array(2, c(2, 3)))
  set_weights(bn, w)
  expect_equal(get_weights(bn), lapply(w, function(a) array(as.double(a), c(2, 3))))
  expect_equal(bn$gamma, array(as.double(1:6), c(2, 3)))
  expect_equal(bn(x), ref_normalize(x, c(2, 3), array(-1, c(2, 3)), array(2, c(2, 3)),
                                    array(1:6, c(2, 3)), array(7:12, c(2, 3))),
               tolerance = 1e-13)
  set_weights(bn, lapply(w, function(a) array(a, c(1, 2, 3))))  # size-1 dims are ignored
  before <- get_weights(bn)
  expect_error(set_weights(bn, w[1:3]), "list of 4 arrays")
  expect_error(set_weights(bn, c(w[1:3], list(1:6))), "weight 4 \\(moving_variance\\)")
  expect_error(set_weights(bn, c(w[1:3], list(array(1, c(3, 2))))), "shape \\(2, 3\\)")
  expect_identical(get_weights(bn), before)
})

test_that("calls that fail leave the layer unchanged", {
  bn <- layer_batch_normalization()
  x <- random_array(c(5, 3), 16)
  expect_error(bn(x, mask = matrix(TRUE, 4, 4)), "does not broadcast")
  expect_false(bn$built)
  invisible(bn(x, training = TRUE))
  before <- get_weights(bn)
  expect_error(bn(random_array(c(5, 4), 1), training = TRUE), "built for inputs of rank 2")
  expect_error(bn(random_array(c(5, 3, 1), 1), training = TRUE), "received shape \\(5, 3, 1\\)")
  expect_error(bn(x, training = NA), "TRUE or FALSE")
  expect_error(bn(x, training = TRUE, mask = c(TRUE, NA, TRUE, TRUE, TRUE)), "NA")
  expect_identical(get_weights(bn), before)
  expect_equal(nrow(bn(random_array(c(9, 3), 2))), 9)  # the batch size may change
})

test_that("layer$backward matches finite differences and sets the gradients", {
  x <- random_array(c(6, 3), 17)
  dy <- random_array(c(6, 3), 18)
  bn <- layer_batch_normalization(gamma_initializer = 2, beta_initializer = "ones")
  y <- bn(x, training = TRUE)
  dx <- bn$backward(dy)
  f <- function(z) bn_train_forward(z, c(2, 2, 2), c(1, 1, 1))$y
  expect_equal(dx, finite_difference(f, x, dy), tolerance = 1e-7)
  expect_equal(as.vector(bn$gradients$beta), colSums(dy), tolerance = 1e-13)
  expect_equal(as.vector(bn$gradients$gamma), colSums(dy * (y - 1) / 2), tolerance = 1e-12)
  inference <- bn(x)
  dx <- bn$backward(dy)
  expect_equal(dx, sweep(dy, 2, 2 / sqrt(bn$moving_variance + 0.001), `*`), tolerance = 1e-13)
  expect_error(bn$backward(dy[1:3, ]), "expected the shape of the last call's output")
  expect_error(layer_batch_normalization()$backward(dy), "no call to differentiate")
})

test_that("initializers: names, numbers, Keras configs, functions", {
  x <- random_array(c(2, 3), 19)
  bn <- layer_batch_normalization(gamma_initializer = function(shape) seq_len(prod(shape)),
                                  beta_initializer = list(class_name = "Constant",
                                                          config = list(value = 0.5)),
                                  moving_mean_initializer = "constant",
                                  moving_variance_initializer = 4)
  invisible(bn(x))
  expect_equal(get_weights(bn), list(array(c(1, 2, 3)), array(0.5, 3), array(0, 3), array(4, 3)))
  expect_error(layer_batch_normalization(gamma_initializer = "he_normal"), "gamma_initializer")
  bad <- layer_batch_normalization(gamma_initializer = function(shape) 1)
  expect_error(bad(x), "must return 3 numbers")
})

test_that("constructor arguments are checked", {
  expect_error(layer_batch_normalization(axis = 0), "1-based")
  expect_error(layer_batch_normalization(momentum = 2), "momentum")
  expect_error(layer_batch_normalization(epsilon = -1), "positive")
  expect_error(layer_batch_normalization(center = "yes"), "center")
  expect_error(layer_batch_normalization(beta_regularizer = "l2"), "not supported")
  expect_error(layer_batch_normalization(synchronized = TRUE), "distributed")
  expect_error(layer_batch_normalization(renorm = TRUE), "renorm")
  expect_error(layer_batch_normalization(foo = 1), "unknown argument\\(s\\) foo")
  expect_error(layer_batch_normalization(dtype = "int8"), "dtype")
  expect_error(layer_batch_normalization(list(layers = 1)), "not keras3 models")
  bn <- layer_batch_normalization(axis = 3)
  expect_error(bn(matrix(1, 2, 2)), "out of range for an input of rank 2")
  expect_error(bn$nothing, "no field `nothing`")
})

test_that("print and format describe the layer", {
  bn <- layer_batch_normalization(axis = c(2, -1), name = "bn_test")
  expect_match(format(bn), "<cbn_layer bn_test: batch normalization, axis = c\\(2L, -1L\\)")
  expect_match(format(bn), "not built")
  invisible(bn(random_array(c(2, 3, 4), 20)))
  expect_output(print(bn), "built for rank 3, channels \\(3, 4\\)")
})

test_that("automatic names follow Keras", {
  a <- layer_batch_normalization()
  b <- layer_batch_normalization()
  expect_match(b$name, "^batch_normalization(_[0-9]+)?$")
  expect_false(identical(a$name, b$name))
})
