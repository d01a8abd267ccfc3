# The layer: a closure over an environment holding its configuration, weights
# and last call. Calling it normalizes; `layer$...` reads fields and methods.

#' Batch normalization layer, as keras3's `layer_batch_normalization()`
#'
#' Normalizes its input per channel: in training mode (`training = TRUE`) with
#' the batch's mean and biased variance, also updating the moving statistics
#' (`moving = moving * momentum + batch * (1 - momentum)`); in inference mode
#' with the moving statistics. Computation is in double precision.
#'
#' The layer is a function: `layer(x, training = FALSE, mask = NULL)`. `x` is a
#' numeric array; `mask` (`NULL`, or logical/numeric, `x`'s shape with sizes
#' that may be 1, or `x`'s shape without its last axis) selects the positions
#' the batch statistics use; every position is normalized. Fields:
#' `layer$trainable` (settable: `FALSE` makes training calls use the moving
#' statistics, as Keras), `layer$name`, `layer$built`, `layer$weights`,
#' `layer$gamma`, `layer$beta`, `layer$moving_mean`, `layer$moving_variance`,
#' `layer$gradients` and `layer$backward(dy)`, which returns the gradient with
#' respect to the last call's input and sets `layer$gradients` (`gamma`,
#' `beta`: the sums of `dy * xhat` and of `dy`).
#'
#' The weights are created at the first call, shaped like the normalized axes
#' of that input (in increasing axis order); later inputs must have the same
#' rank and the same sizes on those axes.
#'
#' @param object `NULL` (or missing) returns the layer; a numeric array returns
#'   the new layer's output on it (inference mode). Anything else (such as a
#'   keras3 model) is an error: this layer works on R arrays.
#' @param axis The normalized axes, 1-based as in keras3: `-1` (the default) is
#'   the last axis, `2` the channels after a channels-first convolution; a
#'   vector names several axes. `0` is an error.
#' @param momentum Momentum of the moving averages, in `[0, 1]`.
#' @param epsilon Positive number added to the variance.
#' @param center,scale Whether to use `beta` / `gamma`.
#' @param beta_initializer,gamma_initializer,moving_mean_initializer,moving_variance_initializer
#'   `"zeros"`, `"ones"`, `"constant"` (0), a number, a Keras initializer
#'   config (`list(class_name = "Constant", config = list(value = 2))`) or a
#'   `function(shape)` returning the values.
#' @param beta_regularizer,gamma_regularizer,beta_constraint,gamma_constraint
#'   Must be `NULL`: this package has no optimizer to apply them.
#' @param synchronized Must be `FALSE`: the R package runs in one process.
#' @param ... `name`, `trainable`, `dtype` (a float policy name; the layer
#'   always computes in double precision), and for configs of tf.keras 2:
#'   `renorm = FALSE`, `renorm_clipping = NULL`, `renorm_momentum`.
#' @return A layer (class `cbn_layer`), or its output when `object` is an array.
#' @examples
#' bn <- layer_batch_normalization(axis = -1)
#' x <- matrix(rnorm(20, mean = 5), nrow = 10)
#' y <- bn(x, training = TRUE)
#' colMeans(y)
#' bn$moving_mean
#' @export
layer_batch_normalization <- function(object = NULL, axis = -1L, momentum = 0.99, epsilon = 0.001,
                                      center = TRUE, scale = TRUE, beta_initializer = "zeros",
                                      gamma_initializer = "ones",
                                      moving_mean_initializer = "zeros",
                                      moving_variance_initializer = "ones",
                                      beta_regularizer = NULL, gamma_regularizer = NULL,
                                      beta_constraint = NULL, gamma_constraint = NULL,
                                      synchronized = FALSE, ...) {
  if (!is.null(object) && !(is.numeric(object) || is.logical(object))) {
    stop(sprintf(paste0("`object` must be NULL (to get the layer) or a numeric array (to apply ",
                        "it); received class %s: cbn layers work on R arrays, not keras3 models"),
                 paste(class(object), collapse = "/")), call. = FALSE)
  }
  for (arg in c("beta_regularizer", "gamma_regularizer", "beta_constraint", "gamma_constraint")) {
    if (!is.null(get(arg))) {
      stop(sprintf("`%s` is not supported by the cbn R package (it has no optimizer); use NULL",
                   arg), call. = FALSE)
    }
  }
  if (!identical(check_flag(synchronized, "synchronized"), FALSE)) {
    stop("`synchronized = TRUE` needs distributed training, which the cbn R package does not have",
         call. = FALSE)
  }
  state <- new.env(parent = emptyenv())
  state$axis <- check_axis_arg(axis)
  state$momentum <- check_number(momentum, "momentum", 0, 1)
  state$epsilon <- check_epsilon(epsilon)
  state$center <- check_flag(center, "center")
  state$scale <- check_flag(scale, "scale")
  state$initializers <- list(
    gamma = as_initializer(gamma_initializer, "gamma_initializer"),
    beta = as_initializer(beta_initializer, "beta_initializer"),
    moving_mean = as_initializer(moving_mean_initializer, "moving_mean_initializer"),
    moving_variance = as_initializer(moving_variance_initializer, "moving_variance_initializer"))
  set_base_arguments(state, list(...))
  state$built <- FALSE
  layer <- new_layer(state)
  if (is.null(object)) layer else layer(object)
}

# name, trainable, dtype and the tf.keras 2 renorm arguments (only "off").
set_base_arguments <- function(state, extra) {
  known <- c("name", "trainable", "dtype", "renorm", "renorm_clipping", "renorm_momentum")
  unknown <- setdiff(names(extra), known)
  if (length(extra) && (is.null(names(extra)) || length(unknown) || any(names(extra) == ""))) {
    stop(sprintf("unknown argument(s) %s; `...` takes %s",
                 paste(c(unknown, if (any(names(extra) == "") || is.null(names(extra))) "<unnamed>"),
                       collapse = ", "), paste(known, collapse = ", ")), call. = FALSE)
  }
  if (isTRUE(extra$renorm) || !is.null(extra$renorm_clipping)) {
    stop("batch renormalization (`renorm = TRUE`) is not supported by the cbn R package",
         call. = FALSE)
  }
  if (!is.null(extra$renorm)) check_flag(extra$renorm, "renorm")
  state$renorm_momentum <- if (is.null(extra$renorm_momentum)) 0.99 else
    check_number(extra$renorm_momentum, "renorm_momentum", 0, 1)
  state$trainable <- if (is.null(extra$trainable)) TRUE else check_flag(extra$trainable, "trainable")
  check_dtype(extra$dtype)
  state$name <- if (is.null(extra$name)) unique_layer_name() else check_name(extra$name)
}

check_name <- function(name) {
  if (!is.character(name) || length(name) != 1L || is.na(name) || !nzchar(name)) {
    stop(sprintf("`name` must be one non-empty string; received %s", deparse1(name)), call. = FALSE)
  }
  name
}

layer_names <- new.env(parent = emptyenv())
layer_names$count <- 0L

# Keras' automatic names: batch_normalization, batch_normalization_1, ...
unique_layer_name <- function() {
  n <- layer_names$count
  layer_names$count <- n + 1L
  if (n == 0L) "batch_normalization" else paste0("batch_normalization_", n)
}

new_layer <- function(state) {
  layer <- function(x, training = FALSE, mask = NULL) layer_call(state, x, training, mask)
  structure(layer, class = c("cbn_layer", "function"))
}

layer_state <- function(layer) environment(unclass(layer))$state

# The axes and channel sizes an input of shape `dims` gives; for a built layer,
# the check that they are the ones it was built for.
input_layout <- function(state, dims) {
  axes <- sort(resolve_axes(state$axis, length(dims)))
  channel_dims <- dims[axes + 1L]
  if (state$built && (length(dims) != state$rank || any(channel_dims != state$channel_dims))) {
    stop(sprintf(paste0("layer %s was built for inputs of rank %d with sizes (%s) on axes %s; ",
                        "received shape (%s)"), state$name, state$rank,
                 paste(state$channel_dims, collapse = ", "), deparse1(state$axis),
                 paste(dims, collapse = ", ")), call. = FALSE)
  }
  list(axes = axes, channel_dims = channel_dims)
}

build_layer <- function(state, dims, layout) {
  weights <- list()
  for (w in c("gamma", "beta", "moving_mean", "moving_variance")) {
    if (w == "gamma" && !state$scale || w == "beta" && !state$center) next
    weights[[w]] <- initial_values(state$initializers[[w]], layout$channel_dims, w)
  }
  state$weights <- weights
  state$rank <- length(dims)
  state$axes <- layout$axes
  state$channel_dims <- layout$channel_dims
  state$built <- TRUE
}

layer_call <- function(state, x, training = FALSE, mask = NULL) {
  x <- as_input_array(x)
  dims <- array_dims(x)
  if (is.null(training)) training <- FALSE
  check_flag(training, "training")
  layout <- input_layout(state, dims)
  mask <- as_mask(mask, dims)
  if (!state$built) build_layer(state, dims, layout)
  w <- state$weights
  gamma <- if (state$scale) as.double(w$gamma)
  beta <- if (state$center) as.double(w$beta)
  batch <- training && state$trainable
  if (batch) {
    res <- .Call(cbn_train_forward_c, x, state$axes, mask, gamma, beta, state$epsilon)
    y <- res$y
    stats <- res[c("mean", "variance")]
    m <- state$momentum
    w$moving_mean[] <- w$moving_mean * m + res$mean * (1 - m)
    w$moving_variance[] <- w$moving_variance * m + res$variance * (1 - m)
    state$weights <- w
  } else {
    stats <- list(mean = as.double(w$moving_mean), variance = as.double(w$moving_variance))
    y <- .Call(cbn_normalize_c, x, state$axes, stats$mean, stats$variance, gamma, beta,
               state$epsilon)
  }
  # x is kept by reference: R's copy-on-modify keeps this value as it was.
  state$last_call <- list(x = x, dims = dims, mask = mask, batch = batch, mean = stats$mean,
                          variance = stats$variance, gamma = gamma)
  dimnames(y) <- dimnames(x)
  y
}

layer_backward <- function(state, dy) {
  rec <- state$last_call
  if (is.null(rec)) {
    stop(sprintf("layer %s has no call to differentiate: call it on an input before backward",
                 state$name), call. = FALSE)
  }
  dy <- as_input_array(dy, "dy")
  if (!identical(as.integer(array_dims(dy)), as.integer(rec$dims))) {
    stop(sprintf("`dy` has shape (%s); expected the shape of the last call's output (%s)",
                 paste(array_dims(dy), collapse = ", "), paste(rec$dims, collapse = ", ")),
         call. = FALSE)
  }
  res <- .Call(cbn_backward_c, dy, rec$x, state$axes, rec$mask, rec$mean, rec$variance,
               rec$gamma, state$epsilon, rec$batch)
  gradients <- list()
  if (state$trainable && state$scale) {
    gradients$gamma <- array(res$sum_dy_xhat, state$channel_dims)
  }
  if (state$trainable && state$center) gradients$beta <- array(res$sum_dy, state$channel_dims)
  state$gradients <- gradients
  dx <- res$dx
  dimnames(dx) <- dimnames(rec$x)
  dx
}

#' @export
`$.cbn_layer` <- function(x, name) {
  state <- layer_state(x)
  switch(name,
    backward = function(dy) layer_backward(state, dy),
    weights = if (state$built) state$weights else list(),
    gamma = , beta = , moving_mean = , moving_variance = state$weights[[name]],
    trainable = , name = , built = , gradients = , momentum = , epsilon = , center = ,
    scale = , axis = state[[name]],
    stop(sprintf("a cbn_layer has no field `%s`", name), call. = FALSE))
}

#' @export
`$<-.cbn_layer` <- function(x, name, value) {
  if (!identical(name, "trainable")) {
    stop(sprintf("`%s` cannot be set; only `trainable` can (set weights with set_weights())",
                 name), call. = FALSE)
  }
  state <- layer_state(x)
  state$trainable <- check_flag(value, "trainable")
  x
}

#' @export
format.cbn_layer <- function(x, ...) {
  s <- layer_state(x)
  built <- if (s$built) {
    sprintf("built for rank %d, channels (%s)", s$rank, paste(s$channel_dims, collapse = ", "))
  } else "not built"
  sprintf(paste0("<cbn_layer %s: batch normalization, axis = %s, momentum = %s, epsilon = %s, ",
                 "center = %s, scale = %s, trainable = %s; %s>"),
          s$name, deparse1(s$axis), format(s$momentum), format(s$epsilon), s$center, s$scale,
          s$trainable, built)
}

#' @export
print.cbn_layer <- function(x, ...) {
  cat(format(x), "\n", sep = "")
  invisible(x)
}
