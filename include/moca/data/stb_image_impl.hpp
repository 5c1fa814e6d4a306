// The stb_image implementation, for exactly one .cpp file of a program that decodes images:
//
//   // main.cpp (and in no other source file of the program)
//   #include <moca/data/stb_image_impl.hpp>
//
// <moca/data/image.hpp> includes only stb_image's declarations (see there why the library does
// not compile a private copy into every translation unit). Including this header in two source
// files of one program gives a duplicate-symbol link error; including it in none gives an
// undefined reference to the function below, whose name says what to do.
//
// Only the JPEG, PNG and BMP decoders are compiled. stb's failure reason is thread-local in C++,
// so images may be decoded on several threads at once.
#pragma once

#ifdef MOCA_STB_IMAGE_EXTERNAL
#error "MOCA_STB_IMAGE_EXTERNAL: stb_image is compiled elsewhere; do not include this header"
#endif

#include "moca/data/image.hpp"  // the declarations first, so the order of includes does not matter

#ifdef STB_IMAGE_IMPLEMENTATION
#error "STB_IMAGE_IMPLEMENTATION is already defined: stb_image would be compiled twice here"
#endif
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_JPEG
#define STBI_ONLY_PNG
#define STBI_ONLY_BMP
#include <stb/stb_image.h>
#undef STB_IMAGE_IMPLEMENTATION

namespace moca::data::detail {
// Referenced by decode_image: present exactly when the implementation was compiled.
void stb_image_missing_include_moca_data_stb_image_impl_hpp_in_one_source_file() {}
}  // namespace moca::data::detail
