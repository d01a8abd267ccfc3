# Initializers, weights in Keras' order and configs interchangeable with
# Python's cbn.BatchNormalization.get_config() (through jsonlite).

KERAS_INITIALIZERS <- c(zeros = "Zeros", ones = "Ones", constant = "Constant")

# An initializer as list(class_name, value) (serializable) or list(fn) (not).
as_initializer <- function(init, name) {
  if (is.function(init)) return(list(fn = init))
  if (is.numeric(init) && length(init) == 1L && !is.na(init)) {
    return(list(class_name = "Constant", value = as.double(init)))
  }
  if (is.character(init) && length(init) == 1L && init %in% names(KERAS_INITIALIZERS)) {
    class_name <- KERAS_INITIALIZERS[[init]]
    return(list(class_name = class_name, value = if (class_name == "Ones") 1 else 0))
  }
  if (is.list(init) && is.character(init$class_name) && init$class_name %in% KERAS_INITIALIZERS) {
    value <- switch(init$class_name, Zeros = 0, Ones = 1,
                    Constant = if (is.null(init$config$value)) 0 else init$config$value)
    if (is.numeric(value) && length(value) == 1L && !is.na(value)) {
      return(list(class_name = init$class_name, value = as.double(value)))
    }
  }
  stop(sprintf(paste0("`%s` must be \"zeros\", \"ones\", \"constant\", a number, a Keras config of ",
                      "Zeros/Ones/Constant or a function(shape); received %s"),
               name, deparse1(init)), call. = FALSE)
}

initial_values <- function(init, channel_dims, weight) {
  if (is.null(init$fn)) return(array(init$value, channel_dims))
  values <- init$fn(channel_dims)
  if (!is.numeric(values) || length(values) != prod(channel_dims)) {
    stop(sprintf("the %s initializer must return %d numbers (shape (%s)); it returned %s",
                 weight, prod(channel_dims), paste(channel_dims, collapse = ", "),
                 deparse1(values)), call. = FALSE)
  }
  array(as.double(values), channel_dims)
}

serialize_initializer <- function(init, name) {
  if (!is.null(init$fn)) {
    stop(sprintf("`%s` is an R function, which a Keras config cannot hold", name), call. = FALSE)
  }
  config <- if (init$class_name == "Constant") list(value = init$value) else
    structure(list(), names = character(0))
  list(module = "keras.initializers", class_name = init$class_name, config = config,
       registered_name = NULL)
}

FLOAT_POLICIES <- c("float16", "bfloat16", "float32", "float64", "mixed_float16",
                    "mixed_bfloat16")

# Keras' dtype policy (a name or its DTypePolicy config): accepted for
# compatibility; the R layer computes in double precision under all of them.
check_dtype <- function(dtype) {
  name <- if (is.list(dtype)) dtype$config$name else dtype
  if (!is.null(dtype) && !(is.character(name) && length(name) == 1L && name %in% FLOAT_POLICIES)) {
    stop(sprintf("`dtype` must be NULL or one of %s (a name or a DTypePolicy config); received %s",
                 paste(FLOAT_POLICIES, collapse = ", "), deparse1(dtype)), call. = FALSE)
  }
  invisible(dtype)
}

#' Weights and configs of a layer
#'
#' `get_weights()` returns the layer's weights in Keras' order: `gamma` (if
#' `scale`), `beta` (if `center`), `moving_mean`, `moving_variance`, each an
#' array shaped like the normalized axes (empty before the first call).
#' `set_weights()` replaces them all at once (same count and shapes; size-1
#' dimensions are ignored) or, on any mismatch, changes nothing.
#'
#' `get_config()` returns Keras' config of the layer as a list, with Keras'
#' (Python, 0-based) axis numbers, as keras3's `get_config()` does;
#' `from_config()` makes a layer from such a list, for example Python's
#' `cbn.BatchNormalization(...).get_config()` read with
#' `jsonlite::fromJSON()`. Write a config for Python with
#' `jsonlite::toJSON(config, auto_unbox = TRUE, null = "null", digits = NA)`.
#'
#' @param object A layer from [layer_batch_normalization()].
#' @param weights A list of numeric arrays, in `get_weights()`'s order.
#' @param config A config list (optionally wrapped as
#'   `list(class_name = "BatchNormalization", config = ...)`).
#' @param ... Unused.
#' @return `get_weights()`: a list of arrays; `set_weights()`: the layer,
#'   invisibly; `get_config()`: a list; `from_config()`: a new layer.
#' @examples
#' bn <- layer_batch_normalization(axis = 2, momentum = 0.9)
#' invisible(bn(array(rnorm(24), c(2, 3, 4)), training = TRUE))
#' str(get_weights(bn))
#' cfg <- get_config(bn)
#' cfg$axis  # 1: Keras' 0-based number of R's axis 2
#' bn2 <- from_config(cfg)
#' @export
get_weights <- function(object, ...) UseMethod("get_weights")

#' @rdname get_weights
#' @export
get_weights.cbn_layer <- function(object, ...) {
  state <- layer_state(object)
  if (state$built) unname(state$weights) else list()
}

#' @rdname get_weights
#' @export
set_weights <- function(object, weights, ...) UseMethod("set_weights")

#' @rdname get_weights
#' @export
set_weights.cbn_layer <- function(object, weights, ...) {
  state <- layer_state(object)
  if (!state$built) {
    stop(sprintf("layer %s has no weights yet: call it on an input first (it sets their shapes)",
                 state$name), call. = FALSE)
  }
  expected <- names(state$weights)
  if (!is.list(weights) || length(weights) != length(expected)) {
    stop(sprintf("`weights` must be a list of %d arrays (%s); received %s of length %d",
                 length(expected), paste(expected, collapse = ", "), class(weights)[1],
                 length(weights)), call. = FALSE)
  }
  want <- state$channel_dims[state$channel_dims != 1L]
  for (i in seq_along(expected)) {
    dims <- array_dims(weights[[i]])
    if (!is.numeric(weights[[i]]) || !identical(as.integer(dims[dims != 1L]), as.integer(want))) {
      stop(sprintf("weight %d (%s) must be numeric of shape (%s); received %s of shape (%s)",
                   i, expected[i], paste(state$channel_dims, collapse = ", "),
                   class(weights[[i]])[1], paste(dims, collapse = ", ")), call. = FALSE)
    }
  }
  state$weights <- stats::setNames(
    lapply(weights, function(w) array(as.double(w), state$channel_dims)), expected)
  invisible(object)
}

#' @rdname get_weights
#' @export
get_config <- function(object, ...) UseMethod("get_config")

#' @rdname get_weights
#' @export
get_config.cbn_layer <- function(object, ...) {
  s <- layer_state(object)
  init <- s$initializers
  list(
    name = s$name, trainable = s$trainable,
    dtype = list(module = "keras", class_name = "DTypePolicy", config = list(name = "float64"),
                 registered_name = NULL),
    axis = ifelse(s$axis > 0L, s$axis - 1L, s$axis),
    momentum = s$momentum, epsilon = s$epsilon, center = s$center, scale = s$scale,
    beta_initializer = serialize_initializer(init$beta, "beta_initializer"),
    gamma_initializer = serialize_initializer(init$gamma, "gamma_initializer"),
    moving_mean_initializer = serialize_initializer(init$moving_mean, "moving_mean_initializer"),
    moving_variance_initializer = serialize_initializer(init$moving_variance,
                                                        "moving_variance_initializer"),
    beta_regularizer = NULL, gamma_regularizer = NULL, beta_constraint = NULL,
    gamma_constraint = NULL, synchronized = FALSE, renorm = FALSE, renorm_clipping = NULL,
    renorm_momentum = s$renorm_momentum)
}

# Keys Keras writes that carry no state of this layer (input shape hints).
SHAPE_HINT_KEYS <- c("batch_input_shape", "batch_shape", "input_shape", "input_dim")

#' @rdname get_weights
#' @export
from_config <- function(config, ...) {
  if (!is.list(config) || is.null(names(config))) {
    stop("`config` must be a named list (a layer config, e.g. from jsonlite::fromJSON())",
         call. = FALSE)
  }
  if (!is.null(config$class_name) && is.list(config$config)) config <- config$config
  config <- config[setdiff(names(config), SHAPE_HINT_KEYS)]
  axis <- unlist(config$axis)
  if (!is.numeric(axis)) {
    stop(sprintf("the config's `axis` must be numbers; received %s", deparse1(config$axis)),
         call. = FALSE)
  }
  config$axis <- ifelse(axis >= 0, axis + 1L, axis)
  do.call(layer_batch_normalization, c(list(object = NULL), config))
}
