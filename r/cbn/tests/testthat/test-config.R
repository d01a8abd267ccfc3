# Configs and results shared with Python's cbn.BatchNormalization through JSON
# files in fixtures/ (tests/test_r_interop.py in the cbn repository checks that
# the Python-written files are what Python writes, and loads r_config.json).

read_fixture <- function(name) jsonlite::fromJSON(test_path("fixtures", name))

to_json <- function(config) jsonlite::toJSON(config, auto_unbox = TRUE, null = "null", digits = NA)

r_layer_for_python <- function() {
  layer_batch_normalization(axis = c(2, -1), momentum = 0.9, epsilon = 0.01, center = FALSE,
                            gamma_initializer = 3, name = "from_r")
}

test_that("get_config / from_config round trip, also through JSON", {
  bn <- layer_batch_normalization(axis = 2, momentum = 0.5, epsilon = 0.1, scale = FALSE,
                                  beta_initializer = "ones", trainable = FALSE, name = "rt")
  config <- get_config(bn)
  expect_equal(config$axis, 1L)  # Keras' 0-based number, as keras3's get_config()
  expect_equal(get_config(from_config(config)), config)
  from_json <- from_config(jsonlite::fromJSON(to_json(config)))
  expect_equal(get_config(from_json), config)
  expect_false(from_json$trainable)
  wrapped <- list(class_name = "BatchNormalization", config = config)
  expect_equal(get_config(from_config(wrapped)), config)
  expect_error(get_config(layer_batch_normalization(gamma_initializer = function(s) 1)),
               "R function")
  expect_error(from_config(list(1)), "named list")
  expect_error(from_config(list(axis = "a")), "must be numbers")
})

test_that("a config written by Python loads in R and reproduces itself", {
  config <- read_fixture("python_config.json")
  bn <- from_config(config)
  expect_equal(bn$axis, c(2L, -1L))
  expect_equal(bn$momentum, 0.9)
  expect_equal(bn$name, "from_python")
  expect_equal(get_config(bn), config)
})

test_that("the R config Python reads (fixtures/r_config.json) is what R writes", {
  # Regenerate: writeLines(to_json(get_config(r_layer_for_python())), "fixtures/r_config.json")
  written <- jsonlite::fromJSON(to_json(get_config(r_layer_for_python())))
  expect_equal(read_fixture("r_config.json"), written)
})

test_that("R and Python layers agree on the same data (training, mask, backward, inference)", {
  run <- read_fixture("python_run.json")
  bn <- from_config(run$config)
  y_train <- bn(run$x, training = TRUE, mask = run$mask)
  expect_equal(y_train, run$y_train, tolerance = 1e-13)
  expect_equal(bn$backward(run$dy), run$dx, tolerance = 1e-13)
  expect_equal(bn$gradients$gamma, run$gradients[1, , ], tolerance = 1e-13)
  expect_equal(bn$gradients$beta, run$gradients[2, , ], tolerance = 1e-13)
  expect_equal(bn$moving_mean, run$moving_mean, tolerance = 1e-14)
  expect_equal(bn$moving_variance, run$moving_variance, tolerance = 1e-14)
  expect_equal(bn(run$x), run$y_infer, tolerance = 1e-13)
})
