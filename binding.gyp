# node-gyp build of the same sources as CMakeLists.txt (the primary, cmake-js build). libtorch is
# located by scripts/find-libtorch.js for both: $LIBTORCH, the Python torch of $BLIP2_PYTHON or
# python3, or the system's.
{
  "targets": [
    {
      "target_name": "blip2_node",
      "sources": ["<!@(node scripts/list-sources.js)"],
      "include_dirs": [
        "<!(node -p \"require('node-addon-api').include_dir\")",
        "native",
        "<!@(node scripts/find-libtorch.js --gyp-includes)"
      ],
      "defines": [
        "NAPI_VERSION=8",
        "NODE_ADDON_API_CPP_EXCEPTIONS",
        "NODE_ADDON_API_CPP_EXCEPTIONS_ALL"
      ],
      # libtorch's headers need RTTI and exceptions.
      "cflags!": ["-fno-exceptions", "-fno-rtti"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-std=gnu++17", "-std=gnu++20"],
      "cflags_cc": ["-std=c++20", "-fexceptions", "-frtti", "-Wno-unused-parameter", "-fopenmp", "<!@(node scripts/find-libtorch.js --gyp-cflags)"],
      "libraries": ["<!@(node scripts/find-libtorch.js --gyp-libs)"],
      "ldflags": ["-fopenmp", "-Wl,-rpath,'$$ORIGIN'", "<!@(node scripts/find-libtorch.js --gyp-ldflags)"]
    }
  ]
}
